-- bench/repro/spin.lua: a handler that burns ~0.1 ms of CPU (no allocation, no I/O) and
-- reports how long it took from its own point of view (x-handler-ms, from os.clock, which
-- is a monotonic wall clock in Luau). Under 64 concurrent connections on one worker some
-- calls take ~1 s of wall time INSIDE the handler: see BENCHMARKS.md, "timeslice stall".
return function(event)
  local t0 = os.clock()
  local s = 0
  for i = 1, 4000 do s = s + i % 7 end
  local t1 = os.clock()
  return {
    statusCode = 200,
    headers = { ["x-handler-ms"] = string.format("%.3f", (t1 - t0) * 1000) },
    body = tostring(s),
  }
end
