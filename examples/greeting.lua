-- greeting.lua: runs unchanged
local function handler(event, ctx)
  return { statusCode = 200, body = "Hello, " .. (event.name or "World") .. "!" }
end
return handler
