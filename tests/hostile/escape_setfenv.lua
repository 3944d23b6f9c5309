-- expect: 500 function_error
return function(event)
  if event.queryStringParameters then return "ok" end
  -- Rewriting a library function through its environment must fail.
  setfenv(string.format, { tostring = function() return "pwned" end })
end
