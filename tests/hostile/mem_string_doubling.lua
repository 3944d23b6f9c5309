-- expect: 500 memory_limit_exceeded
-- config: {"memory": "16MiB"}
return function(event)
  if event.queryStringParameters then return "ok" end
  local s = "x"
  while true do s = s .. s end
end
