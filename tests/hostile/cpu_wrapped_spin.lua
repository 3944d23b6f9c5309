-- expect: 504 function_timeout
-- config: {"timeout": "200ms"}
-- A spin inside coroutine.wrap: the timeslice's forced yield used to surface at the wrap
-- call, which returned at once (204) instead of running into the deadline.
return function(event)
  if event.queryStringParameters then return "ok" end
  coroutine.wrap(function() while true do end end)()
  return "the spin returned"
end
