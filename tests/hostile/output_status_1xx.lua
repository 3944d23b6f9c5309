-- expect: 500 function_error result
-- then: 500 function_error result
-- `101` used to send `101 Switching Protocols` to a request that never asked to upgrade;
-- `100`/`199` a bare 500 without x-request-id. A status must be 200-599.
local calls = 0
return function(event)
  if event.queryStringParameters then return "ok" end
  calls = calls + 1
  return { statusCode = calls == 1 and 101 or 100, body = "switch" }
end
