-- Stateless and stateful Lua iterators doing work per step, varargs through resume.
return function()
  local function iter(limit, i)
    i = i + 1
    if i > limit then return nil end
    local s = 0
    for k = 1, 20 do s = s + (i * k) % 7 end
    return i, s
  end
  local acc = 0
  for i, s in iter, 500, 0 do acc = acc + i * s end
  local co = coroutine.create(function(...)
    local n = select("#", ...)
    local got = { coroutine.yield(n, ...) }
    return #got, got[1], got[3]
  end)
  local a = { coroutine.resume(co, 1, nil, 3, nil) }
  local b = { coroutine.resume(co, "x", nil, "z") }
  return acc .. " " .. tostring(a[2]) .. " " .. tostring(a[3]) .. " " .. tostring(a[5])
    .. " " .. tostring(b[2]) .. " " .. tostring(b[3]) .. " " .. tostring(b[4])
end
