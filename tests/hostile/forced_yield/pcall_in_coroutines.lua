-- Errors, pcall and xpcall inside coroutines, and yields across pcall.
return function()
  local out = {}
  local co = coroutine.wrap(function()
    local ok, err = pcall(function()
      local s = 0
      for i = 1, 1000 do s = s + i end
      coroutine.yield("inside pcall " .. s)
      error("boom " .. s)
    end)
    coroutine.yield(tostring(ok) .. " " .. tostring(err))
    local ok2, err2 = xpcall(function() error({ code = 7 }) end, function(e) return "handled " .. e.code end)
    coroutine.yield(tostring(ok2) .. " " .. tostring(err2))
    error("escaped")
  end)
  out[#out + 1] = co()
  out[#out + 1] = co()
  out[#out + 1] = co()
  local ok, err = pcall(co)
  out[#out + 1] = tostring(ok) .. " " .. tostring(err)
  local ok3, err3 = pcall(co)
  out[#out + 1] = tostring(ok3) .. " " .. tostring(err3)
  local t = coroutine.wrap(function() error({ 1, 2 }) end)
  local ok4, err4 = pcall(t)
  out[#out + 1] = tostring(ok4) .. " " .. type(err4) .. " " .. tostring(err4[2])
  local n = coroutine.wrap(function() error(42) end)
  out[#out + 1] = tostring(select(2, pcall(n)))
  return table.concat(out, " | ")
end
