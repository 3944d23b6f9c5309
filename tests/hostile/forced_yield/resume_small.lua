return function()
  local co = coroutine.create(function(a, b)
    local s = 0
    for i = 1, 2000 do s = s + i % 7 end
    local c = coroutine.yield(s, a + b)
    for i = 1, 500 do s = s + c end
    return s, "done"
  end)
  local r1 = { coroutine.resume(co, 1, 2) }
  local r2 = { coroutine.resume(co, 3) }
  local r3 = { coroutine.resume(co) }
  return table.concat({ tostring(r1[1]), tostring(r1[2]), tostring(r1[3]),
    tostring(r2[1]), tostring(r2[2]), tostring(r2[3]),
    tostring(r3[1]), tostring(r3[2]), coroutine.status(co) }, " ")
end
