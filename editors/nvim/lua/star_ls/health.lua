--- `:checkhealth star_ls`: each part the plugin needs, and the fix when one is missing.
local M = {}

local health = vim.health

--- The model file the server will load: settings.modelPath, $STAR_LS_MODEL, else the cache's default.
local function model_path(settings)
  if settings.modelPath then
    return vim.fn.expand(settings.modelPath)
  end
  if vim.env.STAR_LS_MODEL then
    return vim.env.STAR_LS_MODEL
  end
  local cache = vim.env.STAR_LS_CACHE_DIR
    or ((vim.env.XDG_CACHE_HOME or (vim.env.HOME .. '/.cache')) .. '/star-ls')
  return cache .. '/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf'
end

local function check_neovim()
  if vim.fn.has('nvim-0.12') == 1 and vim.lsp.inline_completion then
    health.ok("Neovim 0.12+: ghost text is Neovim's own vim.lsp.inline_completion")
  elseif vim.fn.has('nvim-0.10') == 1 then
    health.ok("Neovim 0.10/0.11: ghost text from the plugin's fallback (upgrade to 0.12 for Neovim's own)")
  else
    health.error('Neovim 0.10 or newer is needed', { 'Install Neovim 0.12 (https://github.com/neovim/neovim/releases)' })
  end
end

local function check_server(star)
  local exe = star.config.cmd[1]
  if vim.fn.executable(exe) ~= 1 then
    health.error(('the server %q is not executable'):format(exe), {
      'Build it from the star-ls checkout: cargo install --path .',
      "or give its path: require('star_ls').setup({ cmd = { '/path/to/star-ls', 'serve' } })",
    })
  else
    local out = vim.system({ exe, '--version' }, { text = true }):wait()
    if out.code == 0 then
      health.ok(('server: %s (%s)'):format(vim.trim(out.stdout), vim.fn.exepath(exe)))
    else
      health.error(('%s --version failed: %s'):format(exe, vim.trim(out.stderr or '')))
    end
  end
  local model = model_path(star.config.settings or {})
  if vim.uv.fs_stat(model) then
    health.ok('model: ' .. model)
  else
    health.error('no model at ' .. model, {
      'Fetch the default model: scripts/fetch-model (in the star-ls checkout)',
      'or point settings.modelPath or $STAR_LS_MODEL at a qwen2 GGUF',
    })
  end
end

local function check_client(star)
  local client = star.client_for(0)
  if not client then
    health.info('no star-ls server is running (it starts with a buffer of a configured filetype)')
    return
  end
  local s = star.status
  local model = s and tostring(s.model) or 'no status yet'
  if model:match('^failed') then
    health.error('the server could not load the model: ' .. model)
  else
    health.ok(('server running (client %d): model %s'):format(client.id, model))
  end
  health.info('completions here: ' .. (star.is_enabled(0) and 'on' or 'off'))
end

--- A key of the plugin that another plugin or the user has mapped too: the plugin's mapping falls
--- back to theirs when nothing is shown, but one mapped later in the buffer takes the key.
local function check_keys(star)
  for name, lhs in pairs(star.config.keys or {}) do
    if lhs then
      local map = vim.fn.maparg(lhs, 'i', false, true)
      local desc = map.desc or ''
      if vim.tbl_isempty(map) or desc:match('^star%-ls') then
        health.ok(('%s: %s'):format(name, lhs))
      else
        health.warn(
          ('%s: %s is mapped by something else here (%s)'):format(name, lhs, desc ~= '' and desc or map.rhs or 'a function'),
          { ('star-ls takes it in buffers it attaches to and falls back to that mapping; or choose another key: keys = { %s = ... }, or map <Plug>(star-ls-%s)'):format(name, name:gsub('_', '-')) }
        )
      end
    end
  end
end

function M.check()
  local star = require('star_ls')
  health.start('star-ls')
  check_neovim()
  if not star.configured then
    health.warn("setup() has not been called: no server starts", { "require('star_ls').setup({}) in your config" })
  end
  check_server(star)
  check_client(star)
  health.start('star-ls keys')
  check_keys(star)
end

return M
