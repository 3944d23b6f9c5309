-- bench/functions/sleep20.lua: the elasticity benchmark's function (bench/elasticity.sh).
-- Every call waits 20 ms (time.sleep yields: the instance is busy, the thread is not)
-- and answers 200 "ok". So one instance serves at most 50 calls/s, and a load of R
-- calls/s needs R x 0.02 instances: the oracle that moontide-load plots.
local time = require("time")

return function(event)
  time.sleep(20)
  return { statusCode = 200, headers = { ["content-type"] = "text/plain" }, body = "ok" }
end
