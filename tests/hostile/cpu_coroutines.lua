-- expect: 503 function_blocked
-- then: 504 function_timeout
-- config: {"timeout": "200ms"}
return function(event)
  if event.queryStringParameters then return "ok" end
  local function spin() while true do pcall(coroutine.yield) end end
  local chain = coroutine.wrap(function()
    local inner = coroutine.wrap(function() pcall(spin) end)
    while true do pcall(inner) end
  end)
  while true do pcall(chain) end
end
