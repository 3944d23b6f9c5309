-- expect: 503 function_blocked
-- then: 504 function_timeout
-- config: {"timeout": "200ms"}
-- A result that writes little but walks for hours: one table with a million empty slots,
-- shared 20 000² times, encodes as `[[{},{},…],…]` but every `{}` is a walk of a million
-- slots. The call itself returns at once; converting its result is host work after the
-- call, which runs under the call's blocking cap and what is left of its deadline (found
-- by the vm_surface fuzz target).
return function(event)
  if event.queryStringParameters and event.queryStringParameters.ok then
    return "ok"
  end
  return table.create(20000, table.create(20000, table.create(1e6)))
end
