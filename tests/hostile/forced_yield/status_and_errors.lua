-- What the coroutine library reports: status, running, isyieldable, resume errors.
return function()
  local out = {}
  local co
  co = coroutine.create(function()
    out[#out + 1] = coroutine.status(co)
    out[#out + 1] = tostring(coroutine.isyieldable())
    out[#out + 1] = tostring(coroutine.running() == co)
    local s = 0
    for i = 1, 800 do s = s + i end
    return s
  end)
  out[#out + 1] = coroutine.status(co)
  out[#out + 1] = table.concat({ tostring((coroutine.resume(co))) }, "")
  out[#out + 1] = coroutine.status(co)
  out[#out + 1] = tostring(select(2, coroutine.resume(co)))
  out[#out + 1] = tostring(select(2, pcall(coroutine.resume, 42)))
  out[#out + 1] = tostring(select(2, pcall(function() return coroutine.resume(nil) end)))
  out[#out + 1] = tostring(select(2, pcall(coroutine.wrap, 42)))
  out[#out + 1] = tostring(select(2, pcall(function() return coroutine.wrap("x") end)))
  local dead = coroutine.wrap(function() return 1 end)
  dead()
  out[#out + 1] = tostring(select(2, pcall(function() return dead() end)))
  local closing = coroutine.create(function() coroutine.yield(1) end)
  coroutine.resume(closing)
  out[#out + 1] = tostring(coroutine.close(closing)) .. " " .. coroutine.status(closing)
  return table.concat(out, " ")
end
