-- expect: 500 function_error output_body
-- config: {"memory": "64MiB"}
-- A response body over the output cap (6 MiB) is refused, not sent.
return function(event)
  if event.queryStringParameters then return "ok" end
  return { statusCode = 200, body = string.rep("x", 7 * 1024 * 1024) }
end
