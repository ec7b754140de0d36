--- `:StarLs {subcommand}`: the server's commands (workspace/executeCommand) and the client's
--- switches, one command with completion. Created by plugin/star_ls.lua, so it exists before setup().
local M = {}

local star = require('star_ls')
local call = require('star_ls.fallback').call

--- Runs a server command; `on_result(result)` on success, errors shown.
function M.exec(command, arguments, on_result)
  local client = star.client_for(0)
  if not client then
    local hint = star.configured and '' or " (call require('star_ls').setup() in your config)"
    vim.notify('star-ls is not running' .. hint, vim.log.levels.WARN)
    return
  end
  local params = { command = command, arguments = arguments }
  call(client, 'request', 'workspace/executeCommand', params, function(err, result)
    if err then
      local msg = err.message or vim.inspect(err)
      -- The server's messages mostly name the command already.
      if not msg:find(command, 1, true) then
        msg = command .. ': ' .. msg
      end
      vim.notify('star-ls: ' .. msg, vim.log.levels.ERROR)
    elseif on_result then
      on_result(result)
    end
  end, 0)
end

local function to_json(value)
  local ok, s = pcall(vim.json.encode, value, { indent = '  ', sort_keys = true })
  return ok and s or vim.inspect(value)
end

--- Shows `value` in a scratch buffer in a split.
local function show(title, value)
  local text = type(value) == 'string' and value or to_json(value)
  vim.cmd('botright new')
  local buf = vim.api.nvim_get_current_buf()
  vim.bo[buf].buftype = 'nofile'
  vim.bo[buf].bufhidden = 'wipe'
  vim.bo[buf].swapfile = false
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, vim.split(text, '\n', { plain = true }))
  vim.bo[buf].modifiable = false
  if type(value) ~= 'string' then
    vim.bo[buf].filetype = 'json'
  end
  pcall(vim.api.nvim_buf_set_name, buf, 'star-ls://' .. title)
end

--- One line per field of star.status, the model's state first.
function M.format_status(s)
  if type(s) ~= 'table' then
    return 'star-ls: ' .. tostring(s)
  end
  local lines = { 'star-ls: model ' .. tostring(s.model) }
  for _, k in ipairs({ 'failuresPending', 'guardCases', 'patches', 'repairRunning', 'lastRepair' }) do
    if s[k] ~= nil and s[k] ~= vim.NIL then
      lines[#lines + 1] = ('  %s: %s'):format(k, type(s[k]) == 'table' and vim.json.encode(s[k]) or tostring(s[k]))
    end
  end
  return table.concat(lines, '\n')
end

local function report(what)
  return function(r)
    vim.notify(('star-ls: %s: %s'):format(what, type(r) == 'table' and vim.json.encode(r) or tostring(r)))
  end
end

--- One line per patch: id, when, and what its repair fixed.
function M.format_patches(patches)
  if type(patches) ~= 'table' or #patches == 0 then
    return 'no patches'
  end
  local lines = {}
  for _, p in ipairs(patches) do
    local r = type(p.report) == 'table' and p.report or {}
    local when = p.createdMs and os.date('%Y-%m-%d %H:%M', math.floor(p.createdMs / 1000)) or '?'
    lines[#lines + 1] = ('%s  %s  fixed %s of %s failures'):format(p.id, when, r.fixed or '?', r.failures or '?')
  end
  return table.concat(lines, '\n')
end

--- The live patches' ids, asked of the server while completing the command line.
local function patch_ids()
  local client = star.client_for(0)
  if not client then
    return {}
  end
  local params = { command = 'star.listPatches' }
  local answer = call(client, 'request_sync', 'workspace/executeCommand', params, 1000, 0)
  local ids = {}
  for _, p in ipairs(answer and answer.result or {}) do
    ids[#ids + 1] = p.id
  end
  return ids
end

local function switch(on)
  return function(args)
    star.set_enabled(on, args[1] == 'buffer' and vim.api.nvim_get_current_buf() or nil)
    vim.notify(('star-ls: completions %s'):format(star.is_enabled(0) and 'on' or 'off'))
  end
end

--- Subcommands: run(args), and complete(arg_lead) for their first argument.
M.subcommands = {
  status = {
    run = function()
      M.exec('star.status', nil, function(r)
        vim.notify(M.format_status(r), vim.log.levels.INFO)
      end)
    end,
  },
  repair = {
    run = function()
      M.exec('star.repairNow', nil, report('repair'))
    end,
  },
  patches = {
    run = function()
      M.exec('star.listPatches', nil, function(r)
        show('patches', M.format_patches(r))
      end)
    end,
  },
  rollback = {
    run = function(args)
      if not args[1] then
        return vim.notify('star-ls: :StarLs rollback {id|all}', vim.log.levels.WARN)
      end
      M.exec('star.rollback', { args[1] }, report('rollback ' .. args[1]))
    end,
    complete = function()
      return vim.list_extend({ 'all' }, patch_ids())
    end,
  },
  explain = {
    run = function(args)
      local id = args[1] or star.last_completion_id
      if not id then
        return vim.notify('star-ls: no completion handled yet; :StarLs explain {completionId}', vim.log.levels.WARN)
      end
      M.exec('star.explain', { id }, function(r)
        show('explain', r)
      end)
    end,
  },
  forget = {
    --- This buffer's workspace folder, or `all`.
    run = function(args)
      local target = args[1] == 'all' and 'all' or vim.uri_from_fname(star.root_of(0))
      M.exec('star.forget', { target }, report('forget'))
    end,
    complete = function()
      return { 'all' }
    end,
  },
  toggle = { run = switch(nil), complete = function() return { 'buffer' } end },
  enable = { run = switch(true), complete = function() return { 'buffer' } end },
  disable = { run = switch(false), complete = function() return { 'buffer' } end },
}

local function names()
  local all = vim.tbl_keys(M.subcommands)
  table.sort(all)
  return all
end

function M.run(o)
  local args = vim.split(vim.trim(o.args), '%s+', { trimempty = true })
  local sub = M.subcommands[table.remove(args, 1) or 'status']
  if not sub then
    return vim.notify('star-ls: :StarLs {' .. table.concat(names(), '|') .. '}', vim.log.levels.ERROR)
  end
  sub.run(args)
end

function M.complete(lead, line)
  local words = vim.split(line:sub(1, #line - #lead), '%s+', { trimempty = true })
  local candidates = {}
  if #words == 1 then
    candidates = names()
  elseif #words == 2 and M.subcommands[words[2]] and M.subcommands[words[2]].complete then
    candidates = M.subcommands[words[2]].complete()
  end
  return vim.tbl_filter(function(c)
    return vim.startswith(c, lead)
  end, candidates)
end

return M
