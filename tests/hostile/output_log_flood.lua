-- expect: 504 function_timeout
-- config: {"timeout": "300ms"}
-- Log lines are cut at 16 KiB and the per-function ring is bounded: a flood costs
-- nothing but its own time.
return function(event)
  if event.queryStringParameters then return "ok" end
  local line = string.rep("spam", 10000)
  while true do print(line) end
end
