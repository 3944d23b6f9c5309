-- expect: 500 function_error output_header_count
return function(event)
  if event.queryStringParameters then return "ok" end
  local headers = {}
  for i = 1, 1000 do headers["x-h" .. i] = string.rep("v", 100) end
  return { statusCode = 200, headers = headers, body = "flood" }
end
