-- Drives the star-ls Neovim plugin in a headless Neovim as a developer would: open a Python file,
-- check :StarStatus; wait for ghost text, accept it with the plugin's accept key; type a new
-- function, get ghost text in it and type something else over it (optionally dismissing it with the
-- plugin's dismiss key first); save and quit (the server gets shutdown/exit).
--
-- Run by tests/nvim.rs as `nvim --headless --clean -c "lua dofile(os.getenv('STAR_NVIM_SCRIPT'))"`
-- (inside a pcall that quits with an error).
-- Inputs (env): STAR_NVIM_PLUGIN (editors/nvim), STAR_NVIM_SERVER (star-ls binary), STAR_NVIM_FILE
-- (the Python file), STAR_NVIM_OUT (where to write what was seen, as JSON), STAR_NVIM_IDLE_MS
-- (captureIdleMs), STAR_NVIM_GHOST (`native`: Neovim's vim.lsp.inline_completion; `fallback`: the
-- plugin's own ghost text for Neovim < 0.12), STAR_NVIM_DISMISS (`1`: dismiss before typing over).
-- Exits 0 on success, 1 (via :cquit) on any failure or timeout.
--
-- Keys are fed with nvim_feedkeys without the 'x' flag, so they go through Neovim's main loop as
-- typed keys do (insert mode, autocmds, mappings, didChange); the script itself runs in a coroutine
-- that sleeps on timers to let that loop run.

local api = vim.api
local function env(name)
  local v = os.getenv(name)
  return v or error(name .. ' is not set')
end
local out_path = env('STAR_NVIM_OUT')
local idle_ms = tonumber(env('STAR_NVIM_IDLE_MS'))
local fallback = env('STAR_NVIM_GHOST') == 'fallback'
local dismiss = os.getenv('STAR_NVIM_DISMISS') == '1'
local seen = { ghost = fallback and 'fallback' or 'native', notified = {} }

local function log(...)
  io.stderr:write('[capture.lua] ', string.format(...), '\n')
end

local function save()
  local f = assert(io.open(out_path, 'w'))
  f:write(vim.json.encode(seen))
  f:close()
end

local function fail(msg)
  seen.error = tostring(msg)
  log('FAIL: %s', msg)
  pcall(save)
  vim.cmd('cquit 1')
end

local co
local function resume()
  local ok, err = coroutine.resume(co)
  if not ok then
    fail(debug.traceback(co, err))
  end
end

local function sleep(ms)
  vim.defer_fn(resume, ms)
  coroutine.yield()
end

local function now_ms()
  return vim.uv.hrtime() / 1e6
end

--- Polls `cond` until it returns a truthy value, which it returns; fails after `timeout_ms`.
local function wait_for(what, timeout_ms, cond)
  local deadline = now_ms() + timeout_ms
  while true do
    local v = cond()
    if v then
      return v
    end
    if now_ms() > deadline then
      fail(('timed out after %d ms waiting for %s'):format(timeout_ms, what))
      coroutine.yield() -- never resumed: :cquit is under way
    end
    sleep(50)
  end
end

--- Feeds keys through the main loop as typed; `remap` lets mappings (the plugin's keys) apply.
local function feed(keys, remap)
  api.nvim_feedkeys(api.nvim_replace_termcodes(keys, true, false, true), remap and 'mt' or 'nt', false)
end

--- The ghost text shown (the extmark of vim.lsp.inline_completion or of the plugin's fallback):
--- text, row, col; or nil.
local function ghost()
  local ns = api.nvim_get_namespaces()[fallback and 'star_ls.ghost' or 'nvim.lsp.inline_completion']
  if not ns then
    return nil
  end
  for _, m in ipairs(api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })) do
    local d = m[4]
    if d.virt_text then
      local lines = {}
      for _, l in ipairs({ d.virt_text, unpack(d.virt_lines or {}) }) do
        local parts = {}
        for _, chunk in ipairs(l) do
          parts[#parts + 1] = chunk[1]
        end
        lines[#lines + 1] = table.concat(parts)
      end
      return table.concat(lines, '\n'), m[2], m[3]
    end
  end
end

local function line(n)
  return api.nvim_buf_get_lines(0, n - 1, n, true)[1]
end

local function mode()
  return api.nvim_get_mode().mode
end

--- Waits for ghost text on line `n` (1-based) and returns it.
local function ghost_on(n)
  local t0 = now_ms()
  local text = wait_for(('ghost text on line %d'):format(n), 60000, function()
    local text, row = ghost()
    return row == n - 1 and text ~= '' and text
  end)
  log('line %d: ghost text %q after %.0f ms', n, text, now_ms() - t0)
  return text
end

local function run()
  vim.opt.rtp:prepend(env('STAR_NVIM_PLUGIN'))
  if fallback then
    -- As on Neovim 0.10/0.11, which have no vim.lsp.inline_completion.
    vim.lsp.inline_completion = false
  end
  local star = require('star_ls')
  star.setup({
    cmd = { env('STAR_NVIM_SERVER'), 'serve' },
    filetypes = { 'python' },
    settings = { multiline = 'line', captureIdleMs = idle_ms },
  })

  -- Every vim.notify (the user commands report through it) is recorded.
  local notes = {}
  vim.notify = function(msg)
    notes[#notes + 1] = msg
  end
  -- Every LSP message goes to lsp.log (in the test's XDG_STATE_HOME), for the evidence on failure.
  vim.lsp.log.set_level('debug')
  -- The plugin's star/* notifications, in order.
  api.nvim_create_autocmd('LspNotify', {
    callback = function(args)
      local m = args.data.method
      if m:match('^star/') then
        seen.notified[#seen.notified + 1] = { method = m, completion_id = args.data.params.completionId }
        log('sent %s %s', m, vim.json.encode(args.data.params))
      end
    end,
  })

  vim.cmd.edit(vim.fn.fnameescape(env('STAR_NVIM_FILE')))
  if vim.bo.filetype ~= 'python' then
    return fail('filetype is ' .. vim.bo.filetype)
  end
  local client = wait_for('star-ls to attach and initialize', 30000, function()
    local c = vim.lsp.get_clients({ name = 'star-ls', bufnr = 0 })[1]
    return c and c.initialized and c
  end)
  if not fallback then
    wait_for('inline completion to be enabled', 5000, function()
      return vim.lsp.inline_completion.is_enabled({ bufnr = 0 })
    end)
  end
  log('star-ls attached (client %d)', client.id)

  --- Runs an Ex command that reports with vim.notify, and returns what it reported.
  local function reported(cmd)
    local n = #notes
    vim.cmd(cmd)
    return wait_for(cmd .. ' to report', 5000, function()
      return notes[n + 1]
    end)
  end

  -- :StarStatus until the model is loaded: the status names the model and says it is ready.
  local status = wait_for('the model to load (:StarStatus)', 120000, function()
    local msg = reported('StarStatus')
    return msg:match('^star%-ls: model ready: ') and msg or sleep(200)
  end)
  seen.status = status
  log('status: %s', status)

  -- 1. Accept: the cursor after `    return ` (insert mode, as after typing it), the ghost text
  -- taken with the plugin's accept key.
  local before = line(2)
  api.nvim_win_set_cursor(0, { 2, 0 })
  feed('A')
  local proposal = ghost_on(2)
  seen.accept = { line_before = before, proposal = proposal }
  feed(star.config.keys.accept, true)
  local accepted = wait_for('the accepted text in the buffer', 5000, function()
    return line(2) ~= before and line(2)
  end)
  feed('<Esc>')
  seen.accept.line_after = accepted
  log('accepted: %q', accepted)
  if accepted ~= before .. proposal then
    return fail(('accepting %q on %q gave %q'):format(proposal, before, accepted))
  end
  if star.last_completion_id == nil then
    return fail('accepting did not run the star.accepted command')
  end
  seen.accept.completion_id = star.last_completion_id

  -- :StarExplain, with no argument, explains the completion just accepted, in a scratch buffer.
  local win = api.nvim_get_current_win()
  vim.cmd('StarExplain')
  seen.explain = wait_for(':StarExplain', 5000, function()
    local name = api.nvim_buf_get_name(0)
    return name:match('star%-ls://explain$') and table.concat(api.nvim_buf_get_lines(0, 0, -1, true), '\n')
  end)
  log('explain: %s', seen.explain)
  vim.cmd('close')
  if api.nvim_get_current_win() ~= win then
    return fail('closing the explain window did not return to the file')
  end

  -- 2. Correct: a new function typed at the end of the file (the buffer's own indentation rules
  -- indent its body); when the ghost text shows after `    return `, something else is typed over it.
  wait_for('normal mode', 5000, function()
    return mode() == 'n'
  end)
  feed('Go<CR><CR>def sub(a, b):<CR>return ')
  wait_for('the new function', 5000, function()
    return api.nvim_buf_line_count(0) == 10 and line(10) == '    return '
  end)
  before = line(10)
  proposal = ghost_on(10)
  local typed = 'b - a'
  if proposal:sub(1, #typed) == typed then
    return fail('the model proposed what the test meant to type: ' .. proposal)
  end
  seen.correct = { line_before = before, proposal = proposal, typed = typed }
  if dismiss then
    local n = #seen.notified
    feed(star.config.keys.dismiss, true)
    wait_for('the ghost text to go', 5000, function()
      return ghost() == nil
    end)
    wait_for('star/didReject', 5000, function()
      return #seen.notified > n
    end)
    seen.correct.dismissed_id = star.last_completion_id
  end
  feed(typed)
  wait_for('the typed text in the buffer', 5000, function()
    return line(10) == before .. typed
  end)
  feed('<Esc>')
  -- Leave the line, and stay away long enough for the server's idle rule to decide it.
  feed('gg')
  sleep(idle_ms + 1500)
  seen.correct.line_after = line(10)
  log('typed over: %q', line(10))

  -- The status counts what was recorded.
  seen.final_status = reported('StarStatus')
  log('status: %s', seen.final_status)

  seen.file = table.concat(api.nvim_buf_get_lines(0, 0, -1, true), '\n')
  seen.ok = true
  save()
  log('done; writing and quitting')
  vim.cmd('wall')
  vim.cmd('qall')
end

-- A watchdog for anything the waits above do not cover.
vim.defer_fn(function()
  fail('the script did not finish in 240 s')
end, 240000)

co = coroutine.create(run)
vim.schedule(resume)
