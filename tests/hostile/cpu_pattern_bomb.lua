-- expect: 503 function_blocked
-- then: 504 function_timeout
-- config: {"timeout": "200ms"}
return function(event)
  if event.queryStringParameters then return "ok" end
  local s = string.rep("a", 40)
  while true do
    string.find(s, string.rep("a*", 20) .. "b")
  end
end
