-- expect: 504 function_timeout
-- A chain of coroutines that swallows every yield it gets: the timeslice's forced yields
-- pass through it to the host (they are invisible to Lua), so the call is timesliced and
-- ends at its deadline like any loop.
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
