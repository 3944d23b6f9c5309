-- expect: 500 function_error output_body
-- 2 MiB of control characters as a JSON body: under the 6 MiB body cap as text, 12 MiB once
-- each byte is escaped as \u0001. The encoder used to escape all of it (and a 40 MiB string
-- took 240 MiB of host memory) before the size was checked; it now stops at the body cap as
-- the text grows. (2 MiB, not 40: building a 40 MiB string is one C call of ~30 ms in a
-- debug build, which a loaded test machine can stretch past the blocking cap.)
return function(event)
  if event.queryStringParameters then return "ok" end
  return { statusCode = 200, body = { string.rep("\1", 2 * 1024 * 1024) } }
end
