-- Coroutines inside coroutines, each computing between its yields.
return function()
  local log = {}
  local function work(n) local s = 0 for i = 1, n do s = (s + i * 31) % 1000003 end return s end
  local inner = coroutine.create(function()
    for k = 1, 3 do coroutine.yield("i" .. k .. ":" .. work(300)) end
    return "inner-done"
  end)
  local middle = coroutine.wrap(function()
    while true do
      local ok, v = coroutine.resume(inner)
      coroutine.yield("m(" .. tostring(ok) .. "," .. tostring(v) .. "," .. work(200) .. ")")
      if coroutine.status(inner) == "dead" then return "middle-done" end
    end
  end)
  local outer = coroutine.create(function()
    for _ = 1, 5 do
      local v = middle()
      log[#log + 1] = v
      if v == "middle-done" then break end
    end
    return #log
  end)
  local ok, n = coroutine.resume(outer)
  log[#log + 1] = tostring(ok) .. ":" .. tostring(n) .. ":" .. coroutine.status(outer)
  return table.concat(log, " ")
end
