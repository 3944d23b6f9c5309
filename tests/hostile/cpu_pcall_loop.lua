-- expect: 504 function_timeout
-- config: {"timeout": "200ms"}
-- Catching the timeout error must not help: the interrupt keeps firing.
return function(event)
  if event.queryStringParameters then return "ok" end
  while true do
    pcall(function() while true do end end)
  end
end
