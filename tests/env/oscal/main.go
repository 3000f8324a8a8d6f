// Command oscal-validate checks OSCAL JSON documents against NIST's published OSCAL JSON
// schema (draft-07), unmodified, with github.com/santhosh-tekuri/jsonschema/v6.
//
//	oscal-validate [-schema FILE] [-model ROOT] DOCUMENT...
//
// The schema defaults to oscal_complete_schema.json next to this program (where
// tests/env/install.sh puts it). Every document is validated against the whole schema, which
// is the verdict; when one fails, its errors are also reported against the definition of its
// root model alone (taken from the schema's root oneOf), which names the real cause instead
// of "matches none of the eight models". Formats (date-time, uri, uri-reference, email) are
// asserted. The schema's patterns use \p{L} and \p{N}, which Go's regexp (RE2) implements as
// the schema means them.
//
// Exit status: 0 when every document is valid, 1 when one is not, 2 on a usage or I/O error.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"golang.org/x/text/language"
	"golang.org/x/text/message"
)

func main() {
	schemaPath := flag.String("schema", "", "the OSCAL JSON schema (default: oscal_complete_schema.json next to this program)")
	model := flag.String("model", "", "require this root model (for example assessment-results)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [-schema FILE] [-model ROOT] DOCUMENT...\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	if *schemaPath == "" {
		exe, err := os.Executable()
		if err != nil {
			fatal(fmt.Errorf("cannot find this program's directory: %w", err))
		}
		*schemaPath = filepath.Join(filepath.Dir(exe), "oscal_complete_schema.json")
	}
	v, err := newValidator(*schemaPath)
	if err != nil {
		fatal(err)
	}
	failed := false
	for _, path := range flag.Args() {
		problems, err := v.check(path, *model)
		if err != nil {
			fatal(err)
		}
		if len(problems) == 0 {
			fmt.Printf("%s: valid (%s)\n", path, v.id)
			continue
		}
		failed = true
		fmt.Printf("%s: INVALID against %s\n", path, v.id)
		for _, p := range problems {
			fmt.Printf("  %s\n", p)
		}
	}
	if failed {
		os.Exit(1)
	}
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "oscal-validate: %v\n", err)
	os.Exit(2)
}

type validator struct {
	id       string
	complete *jsonschema.Schema
	// The definition of each root model, by its root key.
	models map[string]*jsonschema.Schema
}

func newValidator(path string) (*validator, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read the schema: %w", err)
	}
	defer f.Close()
	doc, err := jsonschema.UnmarshalJSON(f)
	if err != nil {
		return nil, fmt.Errorf("%s is not JSON: %w", path, err)
	}
	obj, ok := doc.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("%s is not a JSON schema object", path)
	}
	id, _ := obj["$id"].(string)
	if id == "" {
		return nil, fmt.Errorf("%s has no $id", path)
	}
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft7)
	c.AssertFormat()
	if err := c.AddResource(id, doc); err != nil {
		return nil, fmt.Errorf("cannot add the schema: %w", err)
	}
	complete, err := c.Compile(id)
	if err != nil {
		return nil, fmt.Errorf("cannot compile the schema: %w", err)
	}
	models := map[string]*jsonschema.Schema{}
	branches, _ := obj["oneOf"].([]any)
	for _, b := range branches {
		branch, _ := b.(map[string]any)
		required, _ := branch["required"].([]any)
		props, _ := branch["properties"].(map[string]any)
		if len(required) != 1 {
			continue
		}
		root, _ := required[0].(string)
		prop, _ := props[root].(map[string]any)
		ref, _ := prop["$ref"].(string)
		if root == "" || !strings.HasPrefix(ref, "#") {
			continue
		}
		sch, err := c.Compile(id + ref)
		if err != nil {
			return nil, fmt.Errorf("cannot compile the definition of %s: %w", root, err)
		}
		models[root] = sch
	}
	return &validator{id: id, complete: complete, models: models}, nil
}

// check returns the problems of the document at path (none when it is valid).
func (v *validator) check(path, model string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read the document: %w", err)
	}
	defer f.Close()
	inst, err := jsonschema.UnmarshalJSON(f)
	if err != nil {
		return []string{fmt.Sprintf("not JSON: %v", err)}, nil
	}
	var problems []string
	root, rootValue := rootModel(inst)
	if model != "" && root != model {
		problems = append(problems, fmt.Sprintf("the root model is %q, not %q", root, model))
	}
	err = v.complete.Validate(inst)
	if err == nil {
		return problems, nil
	}
	var ve *jsonschema.ValidationError
	if !errors.As(err, &ve) {
		return nil, err
	}
	var focused []string
	if sch, ok := v.models[root]; ok {
		// The same document against its own model's definition: the errors that matter,
		// without the other models' "missing property" noise of the root oneOf.
		var mve *jsonschema.ValidationError
		if err := sch.Validate(rootValue); errors.As(err, &mve) {
			focused = leaves(mve, "/"+escape(root))
		}
	}
	if len(focused) > 0 {
		problems = append(problems, focused...)
	} else {
		problems = append(problems, strings.Split(ve.Error(), "\n")...)
	}
	return problems, nil
}

// rootModel returns the document's root model key (the one key besides "$schema") and value.
func rootModel(inst any) (string, any) {
	obj, ok := inst.(map[string]any)
	if !ok {
		return "", nil
	}
	var keys []string
	for k := range obj {
		if k != "$schema" {
			keys = append(keys, k)
		}
	}
	if len(keys) != 1 {
		return "", nil
	}
	return keys[0], obj[keys[0]]
}

// leaves lists the innermost errors under e, sorted: "at <instance location>: <error>
// [<schema location>]".
func leaves(e *jsonschema.ValidationError, prefix string) []string {
	printer := message.NewPrinter(language.English)
	seen := map[string]bool{}
	var out []string
	var walk func(e *jsonschema.ValidationError)
	walk = func(e *jsonschema.ValidationError) {
		if len(e.Causes) > 0 {
			for _, c := range e.Causes {
				walk(c)
			}
			return
		}
		at := prefix
		for _, tok := range e.InstanceLocation {
			at += "/" + escape(tok)
		}
		where := e.SchemaURL
		if i := strings.Index(where, "#"); i >= 0 {
			where = where[i:]
		}
		line := fmt.Sprintf("at %s: %s [schema %s]", at, e.ErrorKind.LocalizedString(printer), where)
		if !seen[line] {
			seen[line] = true
			out = append(out, line)
		}
	}
	walk(e)
	sort.Strings(out)
	return out
}

func escape(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "~", "~0"), "/", "~1")
}
