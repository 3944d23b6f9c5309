-- expect: 500 function_error
-- Every way out is absent; the error names the first one tried.
return function(event)
  if event.queryStringParameters then return "ok" end
  assert(io == nil and debug == nil and package == nil, "io/debug/package present")
  assert(os.execute == nil and os.exit == nil and os.remove == nil, "os escape present")
  assert(loadfile == nil and dofile == nil and string.dump == nil, "file loading present")
  assert(not pcall(loadstring, "\27LuaQ"), "binary chunk loaded")
  error("no escape found")
end
