-- expect: 500 function_error
-- denied: metadata
-- Cloud metadata services in every spelling: refused before any packet is sent (no
-- test ever sends traffic there).
local http = require("http")
local hosts = {
  "169.254.169.254", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518",
  "[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]", "[64:ff9b::a9fe:a9fe]",
  "[fd00:ec2::254]", "169.254.170.2", "100.100.100.200",
}
return function(event)
  if event.queryStringParameters then return "ok" end
  for _, host in ipairs(hosts) do
    local r, err = http.request({ url = "http://" .. host .. "/latest/meta-data/iam/", timeout_ms = 500 })
    if r then return { reached = host, status = r.status } end
    if not string.find(err, "denied by policy: metadata", 1, true) then
      return { not_denied = host, err = err }
    end
  end
  error("every metadata address was denied")
end
