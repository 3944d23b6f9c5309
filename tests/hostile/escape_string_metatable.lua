-- expect: 500 function_error
return function(event)
  if event.queryStringParameters then
    -- The next call (and every other function) still sees the real string library.
    return ("ok"):upper():lower()
  end
  getmetatable("").__index = { upper = function() return "pwned" end }
end
