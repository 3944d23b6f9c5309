-- expect: 500 memory_limit_exceeded
-- config: {"memory": "16MiB"}
return function(event)
  if event.queryStringParameters then return "ok" end
  return string.rep("x", 2 ^ 30)
end
