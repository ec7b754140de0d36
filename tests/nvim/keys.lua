-- The plugin's keys, switches and commands in a headless Neovim 0.12 against the real server:
-- a user's own <Tab> mapping runs where completions are off; accept-word inserts one word and the
-- rest stays shown without the model running again, accept-line and <Tab> take the rest; an
-- excluded file never reaches the server; :StarLs completes its subcommands and patch ids;
-- :checkhealth star_ls and :help star-ls work; the statusline reads the pushed status.
--
-- Run by tests/nvim.rs like capture.lua (same inputs; STAR_NVIM_SECRET is the excluded file).

local H = dofile(vim.fs.joinpath(vim.fs.dirname(os.getenv('STAR_NVIM_SCRIPT')), 'lib.lua'))
local api = vim.api
local seen, line, feed, wait_for, ghost, ghost_on, log, fail =
  H.seen, H.line, H.feed, H.wait_for, H.ghost, H.ghost_on, H.log, H.fail

--- Engine completions run so far, from star.status.
local function completed(client)
  local answer = client:request_sync('workspace/executeCommand', { command = 'star.status' }, 5000, 0)
  return answer.result.completions.completed
end

H.run(function()
  -- The user's own <Tab>, as nvim-cmp or a snippet plugin would map it, before star-ls.
  vim.g.user_tab = 0
  vim.keymap.set('i', '<Tab>', function()
    vim.g.user_tab = vim.g.user_tab + 1
  end, { desc = "the user's tab" })

  local star = H.setup({ settings = { multiline = 'line' } })
  local client = H.open_and_wait(H.env('STAR_NVIM_FILE'))
  seen.folders = client.workspace_folders
  seen.root = vim.uri_from_fname(star.root_of(0))

  -- 1. Completions off in this buffer: <Tab> is the user's.
  H.reported('StarLs disable buffer')
  seen.disabled = not star.is_enabled(0)
  api.nvim_win_set_cursor(0, { 2, 0 })
  feed('A')
  feed('<Tab>', true)
  wait_for("the user's <Tab>", 5000, function()
    return vim.g.user_tab == 1
  end)
  seen.line_after_user_tab = line(2)
  -- The client attaching again keeps the user's mapping behind star-ls's.
  api.nvim_exec_autocmds('LspAttach', { buffer = 0, data = { client_id = client.id } })
  feed('<Tab>', true)
  wait_for("the user's <Tab> again", 5000, function()
    return vim.g.user_tab == 2
  end)
  seen.user_tab = vim.g.user_tab
  feed('<Esc>')
  H.reported('StarLs toggle buffer')
  seen.enabled_again = star.is_enabled(0)

  -- 2. Accept one word: the rest stays shown, and the model did not run for it.
  local before = line(2)
  wait_for('normal mode', 5000, function()
    return H.mode() == 'n'
  end)
  feed('A')
  local proposal = ghost_on(2)
  seen.provenance = star.provenance
  local runs = completed(client)
  feed(star.config.keys.accept_word, true)
  local after_word = wait_for('a word in the buffer', 5000, function()
    return line(2) ~= before and line(2)
  end)
  local word = after_word:sub(#before + 1)
  if word == proposal then
    return fail('the proposal is one word: ' .. proposal)
  end
  local rest = ghost_on(2, proposal)
  seen.word = { proposal = proposal, word = word, rest = rest, runs_before = runs, runs_after = completed(client) }
  log('word %q of %q, then %q shown', word, proposal, rest)

  -- 3. Accept the line: the rest of the line is inserted.
  feed(star.config.keys.accept_line, true)
  seen.line = wait_for('the rest of the line', 5000, function()
    return line(2) ~= after_word and line(2)
  end)
  seen.line_expected = before .. proposal:match('^[^\n]*')
  feed('<Esc>')

  -- 4. An excluded file never reaches the server.
  vim.cmd.edit(vim.fn.fnameescape(H.env('STAR_NVIM_SECRET')))
  seen.secret_filetype = vim.bo.filetype
  seen.secret_clients = #vim.lsp.get_clients({ bufnr = 0 })
  seen.secret_excluded = star.excluded(0)
  vim.cmd('buffer #')

  -- 5. Commands, completion, health, help, statusline.
  seen.subcommands = vim.fn.getcompletion('StarLs ', 'cmdline')
  seen.rollback_args = vim.fn.getcompletion('StarLs rollback ', 'cmdline')
  seen.statusline = star.statusline()
  vim.cmd('StarLs patches')
  seen.patches = wait_for(':StarLs patches', 5000, function()
    return api.nvim_buf_get_name(0):match('star%-ls://patches$') and api.nvim_buf_get_lines(0, 0, -1, true)
  end)
  vim.cmd('close')
  vim.cmd('checkhealth star_ls')
  seen.health = table.concat(api.nvim_buf_get_lines(0, 0, -1, true), '\n')
  vim.cmd('close')
  -- A user whose binary and model are missing is told so, with the fix.
  local cmd, settings = star.config.cmd, star.config.settings
  star.config.cmd, star.config.settings = { '/nonexistent/star-ls', 'serve' }, { modelPath = '/nonexistent/model.gguf' }
  vim.cmd('checkhealth star_ls')
  seen.health_missing = table.concat(api.nvim_buf_get_lines(0, 0, -1, true), '\n')
  vim.cmd('close')
  star.config.cmd, star.config.settings = cmd, settings
  vim.cmd('helptags ' .. vim.fn.fnameescape(H.env('STAR_NVIM_PLUGIN') .. '/doc'))
  vim.cmd('help star-ls-keys')
  seen.help = vim.fs.basename(api.nvim_buf_get_name(0))
  vim.cmd('close')
end)
