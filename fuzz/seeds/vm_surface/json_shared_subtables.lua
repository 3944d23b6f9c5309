--lua init: shared sub-tables describe far more JSON than the state holds (the vm_surface find)
v1 = table.create(65535, table.create(65535, table.create(65535, '')))
v2 = {pcall(json.encode, v1)}
v3 = {pcall(json.encode, {v1, v1})}
v0 = {statusCode = 200, body = v1}
v0 = v1
v4 = table.create(20000, table.create(1e6))
v5 = {pcall(json.encode, v4)}
v0 = v4
