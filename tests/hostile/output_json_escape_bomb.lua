-- expect: 500 function_error output_body
-- config: {"memory": "128MiB"}
-- 40 MiB of control characters as a JSON body: escaped, 240 MiB of host memory before the
-- size was checked. The encoder now stops at the body cap (6 MiB) as the text grows.
return function(event)
  if event.queryStringParameters then return "ok" end
  return { statusCode = 200, body = { string.rep("\1", 40 * 1024 * 1024) } }
end
