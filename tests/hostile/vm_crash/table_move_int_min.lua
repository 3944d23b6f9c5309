-- luau-lang/luau#2970 (Luau 0.740, 0.745): moving 2^31-1 elements into a table that holds
-- the key -2^31 reads out of bounds in luaH_resizearray (SIGSEGV, not catchable by pcall).
-- result: true true 1
local d = {}
d[-2147483648] = 1
return function()
  local ok, moved = pcall(table.move, {1}, 1, 2147483647, 1, d)
  return tostring(ok) .. " " .. tostring(moved == d) .. " " .. tostring(d[1])
end
