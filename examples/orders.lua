-- orders.lua: a JSON API handler. POST a JSON order; get it back priced and stamped.
--   curl -s -X POST http://127.0.0.1:8080/fn/orders -d '{"items":[{"sku":"A-100","qty":2,"price":19.99}]}'
local json = require("json")

local function handler(event, ctx)
  if event.httpMethod ~= "POST" then
    return { statusCode = 405, headers = { allow = "POST" }, body = "use POST\n" }
  end
  local ok, order = pcall(json.decode, event.body or "")
  if not ok or type(order) ~= "table" then
    return { statusCode = 400, headers = { ["content-type"] = "application/json" },
             body = json.encode({ error = "body must be a JSON object" }) }
  end
  local total = 0
  for _, item in ipairs(order.items or {}) do
    total = total + (tonumber(item.qty) or 0) * (tonumber(item.price) or 0)
  end
  order.total = math.floor(total * 100 + 0.5) / 100
  order.request_id = ctx.request_id
  print(("priced %d items: %.2f"):format(#(order.items or {}), order.total))  -- to `moontide logs orders`
  return { statusCode = 200, headers = { ["content-type"] = "application/json" }, body = json.encode(order) }
end

return handler
