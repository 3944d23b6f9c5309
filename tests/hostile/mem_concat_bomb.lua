-- expect: 500 memory_limit_exceeded
-- config: {"memory": "16MiB"}
return function(event)
  if event.queryStringParameters then return "ok" end
  local parts = {}
  for i = 1, 64 do parts[i] = string.rep("y", 1024 * 1024) end
  return table.concat(parts)
end
