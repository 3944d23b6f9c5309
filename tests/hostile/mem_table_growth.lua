-- expect: 500 memory_limit_exceeded
-- config: {"memory": "16MiB"}
return function(event)
  if event.queryStringParameters then return "ok" end
  local t = {}
  for i = 1, 1e9 do t[i] = { i } end
end
