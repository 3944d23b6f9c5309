-- expect: 500 function_error result
-- A header value carrying CR LF (response splitting) is an error, never a panic or a line.
return function(event)
  if event.queryStringParameters then return "ok" end
  return { statusCode = 200, headers = { ["x-a"] = "a\r\nSet-Cookie: evil=1" }, body = "x" }
end
