-- expect: 500 function_error
return function(event)
  if event.queryStringParameters then return "ok" end
  local t = setmetatable({}, {})
  getmetatable(t).__index = function(self, k) return self[k .. "x"] end
  return t.a
end
