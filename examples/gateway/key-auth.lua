-- A plugin: one module, several phases. On a route: plugins: [{name: key-auth, config: {keys: [...]}}]
local M = {}

-- access: let the request through only with a known API key (x-api-key header).
function M.access(req, ctx)
  local key = req.headers["x-api-key"]
  for _, allowed in ipairs(ctx.conf.keys or {}) do
    if key == allowed then
      ctx.consumer = key
      req.headers["x-api-key"] = nil          -- the upstream never sees the key
      req.headers["x-consumer"] = key:sub(1, 4) .. "***"
      return nil
    end
  end
  return { statusCode = 401, headers = { ["www-authenticate"] = "ApiKey" }, body = "missing or unknown API key\n" }
end

-- header_filter: say who was served (ctx carries state across phases of one request).
function M.header_filter(res, ctx)
  res.headers["x-served-for"] = ctx.consumer and (ctx.consumer:sub(1, 4) .. "***") or "nobody"
end

-- log: after the response has gone out.
function M.log(req, res, ctx)
  ctx.log("served " .. req.method .. " " .. req.path .. " " .. res.status)
end

return M
