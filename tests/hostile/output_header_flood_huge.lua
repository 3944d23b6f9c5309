-- expect: 500 function_error output_header_count
-- 100 000 headers: past 32 768 the http crate's HeaderMap panics, which used to kill the
-- worker's task (an empty reply, ~23 KB of backtrace in the server log). Now they are
-- counted before any is copied.
return function(event)
  if event.queryStringParameters then return "ok" end
  local headers = {}
  for i = 1, 100000 do headers["x-h" .. i] = "v" end
  return { statusCode = 200, headers = headers, body = "flood" }
end
