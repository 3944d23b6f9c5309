-- tiny-slice: skip
-- The reproduction of issue 13 §2: with a 2 ms slice the forced yield surfaced at the
-- user's resume as `true nil`.
return function()
  local co = coroutine.create(function()
    local s = 0
    for i = 1, 3e6 do s = s + i % 7 end
    coroutine.yield(s)
  end)
  local ok, v = coroutine.resume(co)
  return "resume -> " .. tostring(ok) .. " " .. tostring(v)
end
