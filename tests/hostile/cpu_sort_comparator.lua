-- expect: 503 function_blocked
-- then: 504 function_timeout
-- config: {"timeout": "200ms"}
return function(event)
  if event.queryStringParameters then return "ok" end
  local t = {}
  for i = 1, 1000 do t[i] = i end
  table.sort(t, function(a, b) for _ = 1, 1e6 do end return a < b end)
end
