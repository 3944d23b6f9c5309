-- bench/functions/json.lua: the anchor's /json, as a Lambda-style handler.
-- POST a JSON object; decode it, add processed=true and gateway="moontide", encode it
-- back as application/json. Same checks and errors as the anchor's content_by_lua_block.
local json = require("json")

local JSON_HEADERS = { ["content-type"] = "application/json" }

return function(event)
  if event.httpMethod ~= "POST" then
    return { statusCode = 405, body = "" }
  end
  local body = event.body
  if body == nil or body == "" then
    return { statusCode = 400, headers = JSON_HEADERS, body = '{"error":"empty body"}' }
  end
  local ok, obj = pcall(json.decode, body)
  if not ok or type(obj) ~= "table" then
    return { statusCode = 400, headers = JSON_HEADERS, body = '{"error":"invalid json"}' }
  end
  obj.processed = true
  obj.gateway = "moontide"
  return { statusCode = 200, headers = JSON_HEADERS, body = json.encode(obj) }
end
