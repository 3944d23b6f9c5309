-- bench/functions/hello.lua: the anchor's /hello, as a Lambda-style handler.
-- GET /fn/hello?name=X -> "Hello, X!"; no (or empty) name -> "Hello, World!".
-- Query values arrive URL-decoded (the anchor calls ngx.unescape_uri itself).
-- A string result is answered as 200 text/plain.
return function(event)
  local query = event.queryStringParameters
  local name = query and query.name
  if name == nil or name == "" then
    name = "World"
  end
  return "Hello, " .. name .. "!"
end
