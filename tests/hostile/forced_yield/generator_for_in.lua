-- A generator built on coroutine.wrap, consumed by a generic for.
local function range(n)
  return coroutine.wrap(function()
    for i = 1, n do coroutine.yield(i, i * i) end
  end)
end
return function()
  local total, squares = 0, 0
  for i, sq in range(3000) do
    total = total + i
    squares = squares + sq % 97
  end
  return total .. " " .. squares
end
