-- counter.lua: a node-wide counter in the shared dictionary (like ngx.shared.DICT).
local shared = require("shared")

return function(event, ctx)
  local hits = shared.incr("counter:hits", 1, 0)
  return { hits = hits, instance_note = "every instance of every function sees the same dictionary" }
end
