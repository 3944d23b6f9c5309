-- expect: 500 function_error output_header_count
-- One name with 200 000 values in multiValueHeaders: each value is a header line.
return function(event)
  if event.queryStringParameters then return "ok" end
  local values = {}
  for i = 1, 200000 do values[i] = "v" end
  return { statusCode = 200, multiValueHeaders = { ["set-cookie"] = values }, body = "flood" }
end
