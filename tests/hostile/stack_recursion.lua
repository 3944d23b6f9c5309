-- expect: 500 function_error
return function(event)
  if event.queryStringParameters then return "ok" end
  local function down(n) return down(n + 1) + 1 end
  return down(1)
end
