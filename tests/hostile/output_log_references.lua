-- expect: 200 ok
-- 7 000 references to one 4 MiB string in one print: costs the Lua state 4 MiB, but
-- joining them before cutting the line needed 28 GB of host memory (the node aborted).
-- Lines are now built within the 16 KiB cap and the rest is only counted.
return function(event)
  if event.queryStringParameters then return "ok" end
  local s = string.rep("x", 4 * 1024 * 1024)
  local t = {}
  for i = 1, 7000 do t[i] = s end
  print(table.unpack(t))
  return "logged"
end
