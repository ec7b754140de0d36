-- Drives the star-ls Neovim plugin in a headless Neovim as a developer would: open a Python file,
-- check :StarLs status; wait for ghost text, accept it with the plugin's accept key; type a new
-- function, get ghost text in it and type something else over it (optionally dismissing it with the
-- plugin's dismiss key first); save and quit (the server gets shutdown/exit).
--
-- Run by tests/nvim.rs as `nvim --headless --clean -c "lua dofile(os.getenv('STAR_NVIM_SCRIPT'))"`
-- (inside a pcall that quits with an error), with tests/nvim/lib.lua beside it.
-- Inputs (env): STAR_NVIM_PLUGIN (editors/nvim), STAR_NVIM_SERVER (star-ls binary), STAR_NVIM_FILE
-- (the Python file), STAR_NVIM_OUT (where to write what was seen, as JSON), STAR_NVIM_IDLE_MS
-- (captureIdleMs), STAR_NVIM_GHOST (`native`: Neovim's vim.lsp.inline_completion; `fallback`: the
-- plugin's own ghost text for Neovim < 0.12), STAR_NVIM_DISMISS (`1`: dismiss before typing over).
-- Exits 0 on success, 1 (via :cquit) on any failure or timeout.

local H = dofile(vim.fs.joinpath(vim.fs.dirname(os.getenv('STAR_NVIM_SCRIPT')), 'lib.lua'))
local api = vim.api
local seen, line, mode, feed, wait_for, ghost, ghost_on, sleep, log, fail =
  H.seen, H.line, H.mode, H.feed, H.wait_for, H.ghost, H.ghost_on, H.sleep, H.log, H.fail
local idle_ms = tonumber(H.env('STAR_NVIM_IDLE_MS'))
local dismiss = os.getenv('STAR_NVIM_DISMISS') == '1'

H.run(function()
  local star = H.setup({ settings = { multiline = 'line', captureIdleMs = idle_ms } })
  H.open_and_wait(H.env('STAR_NVIM_FILE'))

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

  -- :StarLs explain, with no argument, explains the completion just accepted, in a scratch buffer.
  local win = api.nvim_get_current_win()
  vim.cmd('StarLs explain')
  seen.explain = wait_for(':StarLs explain', 5000, function()
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
  seen.final_status = H.reported('StarLs status')
  log('status: %s', seen.final_status)

  seen.file = table.concat(api.nvim_buf_get_lines(0, 0, -1, true), '\n')
end)
