-- Loaded at startup whether or not setup() is called: the :StarLs command, the <Plug> maps and the
-- suggestion's highlight group. Everything else waits for require('star_ls').setup().
if vim.g.loaded_star_ls then
  return
end
vim.g.loaded_star_ls = true

vim.api.nvim_set_hl(0, 'StarLsSuggestion', { link = 'Comment', default = true })

vim.api.nvim_create_user_command('StarLs', function(o)
  require('star_ls.commands').run(o)
end, {
  nargs = '*',
  complete = function(lead, line)
    return require('star_ls.commands').complete(lead, line)
  end,
  desc = 'star-ls: status, repair, patches, rollback, explain, forget, toggle, enable, disable',
})

-- For your own mappings: each does nothing when no completion is shown.
for name, plug in pairs({
  accept = '<Plug>(star-ls-accept)',
  accept_line = '<Plug>(star-ls-accept-line)',
  accept_word = '<Plug>(star-ls-accept-word)',
  dismiss = '<Plug>(star-ls-dismiss)',
}) do
  vim.keymap.set('i', plug, function()
    require('star_ls').actions[name]()
  end, { desc = 'star-ls: ' .. name:gsub('_', ' ') })
end
