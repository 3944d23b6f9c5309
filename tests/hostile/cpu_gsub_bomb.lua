-- expect: 503 function_blocked
-- then: 504 function_timeout
-- config: {"timeout": "200ms"}
return function(event)
  if event.queryStringParameters then return "ok" end
  local s = string.rep("a", 5000)
  while true do
    s:gsub("(a*)*b", "x")
    for _ in s:gmatch("a-a-a-a-a-a-b") do end
  end
end
