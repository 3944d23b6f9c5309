-- expect: 500 function_error
return function(event)
  if event.queryStringParameters then return "ok" end
  return require("/etc/passwd")
end
