-- expect: 504 function_timeout
-- config: {"timeout": "200ms"}
return function(event)
  if event.queryStringParameters then return "ok" end
  while true do end
end
