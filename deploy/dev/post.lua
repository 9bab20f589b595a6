-- wrk script: POST the body in $BENCH_BODY with $KEY, replacing __EXT__ by an id unique
-- per request (run, thread, counter), so every request is a distinct call record.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local template, counter, run = nil, 0, os.getenv("RUN") or "r"
function init(args)
  local f = assert(io.open(os.getenv("BENCH_BODY"), "r"))
  template = f:read("*a")
  f:close()
end

function request()
  counter = counter + 1
  local ext = run .. "-" .. tostring(tid) .. "-" .. counter
  local body = string.gsub(template, "__EXT__", ext)
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["x-api-key"] = os.getenv("KEY") or "",
  }, body)
end
