-- expect: 200 ok
-- then: 200 ok
-- The body is itself an HTTP response with its own Set-Cookie, and the function sets the
-- framing: with `content-length: 0` the node used to send three responses on a keep-alive
-- connection, the forged one in the middle. Framing headers are now dropped (one warning
-- per call in the function log) and the node frames the body itself: the next call on the
-- same connection gets its own answer, not the forged one.
local forged = "HTTP/1.1 200 OK\r\nSet-Cookie: session=stolen\r\nContent-Length: 5\r\n\r\npwned"
return function(event)
  if event.queryStringParameters then return "ok" end
  return {
    statusCode = 200,
    headers = { ["Content-Length"] = "0", ["Connection"] = "keep-alive",
                ["Transfer-Encoding"] = "identity" },
    multiValueHeaders = { ["content-length"] = { "0", "100000" } },
    body = forged,
  }
end
